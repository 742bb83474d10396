"""Video: stylized clips that do not flicker (Ruder et al. 2016), with DIS optical flow and PyAV.

Needs the ``video`` extra (``pip install nsf[video]``: ``av``, ``opencv-python-headless``).
``nsf.video.frames(model, src, style, ...)`` yields frames as they are done; ``nsf.video.render(...)`` runs to the
end; ``model.stylize_video(...)`` is the same from the model.
"""

from .driver import LATER_STEPS, TEMPORAL_WEIGHT, VideoFrame, VideoResult, frames, later_config, render
from .flow import Flow, consistency, temporal_loss, warp, warping_error
from .io import VideoInfo, VideoWriter, probe, read_frames, read_video_metadata

__all__ = ["LATER_STEPS", "TEMPORAL_WEIGHT", "Flow", "VideoFrame", "VideoInfo", "VideoResult", "VideoWriter",
           "consistency", "frames", "later_config", "probe", "read_frames", "read_video_metadata", "render",
           "temporal_loss", "warp", "warping_error"]
