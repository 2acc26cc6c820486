"""See what each method does: record what a run computes (Recorder, through RunInfo), turn it into pictures.

    recorder.py  what the attention layers and processors hand out during a run, kept small
    pictures.py  pure functions: recorded tensors -> frames (F, 3, h, w) in [0, 1]
    plots.py     small hand-written SVG plots
    figures.py   captioned Pictures for each method's report (stemref/report.py writes them into index.html)
"""
from .figures import (Picture, fatezero_pictures, inversion_pictures, similarity_plot, tokenflow_pictures,
                      tuning_pictures)
from .pictures import (basis_frames, correspondence_frames, heat, mask_frames, palette, pca_rgb, position_colours,
                       similarity_frames)
from .plots import keyframe_chart, line_plot
from .recorder import Recorder, fatezero_recorders, inversion_recorder, level_layers, tokenflow_recorder

__all__ = ["Picture", "Recorder", "basis_frames", "correspondence_frames", "fatezero_pictures", "fatezero_recorders",
           "heat", "inversion_pictures", "inversion_recorder", "keyframe_chart", "level_layers", "line_plot",
           "mask_frames", "palette", "pca_rgb", "position_colours", "similarity_frames", "similarity_plot",
           "tokenflow_pictures", "tokenflow_recorder", "tuning_pictures"]
