"""read_video: frames picked by real presentation times, resize/crop, subsampling, and clear errors."""
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from nanod2vlm.data import normalize, read_video
from nanod2vlm.files import InputError


def make_video(path, times, levels, rate=30, codec="libx264", w=64, h=48, options=None):
    """Frames shown at `times` (seconds) with grey level `levels[i]`; pts are set explicitly, so irregular times
    give a variable-frame-rate file."""
    tb = Fraction(1, 30000)
    with av.open(str(path), "w", options=options or {}) as c:
        s = c.add_stream(codec, rate=rate)
        s.width, s.height, s.pix_fmt, s.time_base = w, h, "yuv420p", tb
        s.codec_context.time_base = tb
        for t, v in zip(times, levels):
            f = av.VideoFrame.from_ndarray(np.full((h, w, 3), v, np.uint8), format="rgb24")
            f.pts, f.time_base = round(t / tb), tb
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def level_ids(frames, levels):
    """Index of the nearest grey level of each decoded frame."""
    return (frames.float().mean((1, 2, 3))[:, None] - torch.tensor(levels)[None]).abs().argmin(1).tolist()


def test_colour_changes_land_on_the_right_frames(tmp_path):
    # 4 s at 30 fps: level 0 before 1.5 s, level 1 in [1.5, 2.5), level 2 after
    times = [i / 30 for i in range(120)]
    seg = [0 if t < 1.5 - 1e-9 else 1 if t < 2.5 - 1e-9 else 2 for t in times]
    levels = [30, 130, 230]
    p = make_video(tmp_path / "c.mp4", times, [levels[i] for i in seg])
    frames, t = read_video(p, fps=1, size=32)
    assert frames.shape == (4, 3, 32, 32) and frames.dtype == torch.uint8
    assert torch.allclose(t, torch.tensor([0.0, 1, 2, 3]), atol=1e-4)
    assert level_ids(frames, levels) == [0, 0, 1, 2]
    frames, t = read_video(p, fps=2, size=32)
    assert torch.allclose(t, torch.arange(8) / 2, atol=1e-4)
    assert level_ids(frames, levels) == [0, 0, 0, 1, 1, 2, 2, 2]


def test_ntsc_29_97_times(tmp_path):
    rate = Fraction(30000, 1001)
    times = [i / rate for i in range(90)]
    levels = [30, 130, 230]
    p = make_video(tmp_path / "ntsc.mp4", [float(t) for t in times], [levels[i // 30] for i in range(90)], rate=rate)
    frames, t = read_video(p, fps=1, size=32)
    assert torch.allclose(t, torch.tensor([0.0, 1.001, 2.002]), atol=1e-4)  # first frame at or after k s
    assert level_ids(frames, levels) == [0, 1, 2]


def test_variable_frame_rate_times(tmp_path):
    times = [0.0, 0.1, 0.25, 0.9, 1.05, 1.6, 2.7, 2.75, 3.2]
    levels = [10 + 28 * i for i in range(len(times))]  # each source frame has its own level
    p = make_video(tmp_path / "vfr.mp4", times, levels)
    for fps, expect in ((1, [0.0, 1.05, 2.7, 3.2]), (2, [0.0, 0.9, 1.05, 1.6, 2.7, 3.2])):
        frames, t = read_video(p, fps=fps, size=32)
        assert torch.allclose(t, torch.tensor(expect), atol=1e-4)  # the 2.7 s frame serves 2.0 and 2.5 once
        assert level_ids(frames, levels) == [times.index(x) for x in expect]


def test_max_frames_keeps_true_times_and_colours(tmp_path):
    times = [i / 10 for i in range(100)]  # 10 s at 10 fps, a new level every second
    levels = [10 + 25 * s for s in range(10)]
    p = make_video(tmp_path / "long.mp4", times, [levels[int(t + 1e-9)] for t in times], rate=10, codec="mpeg4")
    frames, t = read_video(p, fps=1, size=32, max_frames=4)
    # the 9th kept frame is one more than 2 * 4: every other one goes (0, 2, 4, 6, 8; 9 is not on that grid), then
    # linspace(0, 4, 4) rounds to 0, 1, 3, 4 of those
    assert torch.allclose(t, torch.tensor([0.0, 2, 6, 8]), atol=1e-4)
    assert level_ids(frames, levels) == [0, 2, 6, 8]


def test_resize_short_side_and_center_crop(tmp_path):
    # 96x48 frame: left half black, right half white; short side 48 -> 24, width 48, crop keeps the middle 24
    img = np.zeros((48, 96, 3), np.uint8)
    img[:, 48:] = 255
    with av.open(str(tmp_path / "lr.mp4"), "w") as c:
        s = c.add_stream("libx264", rate=1, options={"qp": "0"})
        s.width, s.height, s.pix_fmt = 96, 48, "yuv444p"
        for p in [*s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")), *s.encode()]:
            c.mux(p)
    frames, _ = read_video(tmp_path / "lr.mp4", size=24)
    col = frames[0].float().mean((0, 1))  # mean over channels and rows -> (24,)
    assert col[:10].max() < 10 and col[14:].min() > 245  # the crop is centred on the black/white edge
    x = normalize(frames)
    assert x.dtype == torch.float32 and torch.allclose(x[0, :, 0, 0], -torch.tensor([0.48145466, 0.4578275, 0.40821073])
                                                      / torch.tensor([0.26862954, 0.26130258, 0.27577711]), atol=0.1)


def make_bad(kind, tmp_path):
    p = tmp_path / f"{kind}.{'avi' if kind == 'zero_frames' else 'mp4'}"
    if kind == "text":
        p.write_text("this is not a video\n")
    elif kind == "random":
        p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "audio":
        with av.open(str(p), "w") as c:
            s = c.add_stream("aac", rate=16000, layout="mono")
            for i in range(10):
                f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
                f.sample_rate, f.pts = 16000, i * 1024
                for pk in s.encode(f):
                    c.mux(pk)
            for pk in s.encode():
                c.mux(pk)
    elif kind == "zero_frames":  # a video stream with no frames (avi keeps the empty stream, mp4 drops it)
        with av.open(str(p), "w") as c:
            s = c.add_stream("mpeg4", rate=30)
            s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
            c.start_encoding()
    elif kind == "truncated":  # moov atom at the end (the default): the first half has no index
        full = make_video(tmp_path / "full.mp4", [i / 30 for i in range(60)], [100] * 60).read_bytes()
        p.write_bytes(full[: len(full) // 2])
    return p


@pytest.mark.parametrize("kind, reason", [
    ("missing", "not found"), ("text", "cannot decode"), ("random", "cannot decode"), ("audio", "no video stream"),
    ("zero_frames", "no decodable video frames"), ("truncated", "cannot decode")])
def test_bad_input_gives_an_input_error_naming_the_path(kind, reason, tmp_path):
    p = make_bad(kind, tmp_path)
    with pytest.raises(InputError) as e:
        read_video(p)
    assert str(p) in str(e.value) and reason in str(e.value) and isinstance(e.value, ValueError)


def test_truncated_with_index_up_front_keeps_prefix_with_warning(tmp_path):
    times = [i / 30 for i in range(300)]  # 10 s, the index (moov) written first, so the cut file still opens
    full = make_video(tmp_path / "fs.mp4", times, [100] * 300, options={"movflags": "faststart"}).read_bytes()
    p = tmp_path / "cut.mp4"
    p.write_bytes(full[: len(full) * 3 // 4])  # (solid frames: the index is a large part of this small file)
    with pytest.warns(UserWarning, match="cut.mp4"):
        frames, t = read_video(p)
    assert 2 <= len(t) < 10 and torch.allclose(t, torch.arange(len(t)).float(), atol=1e-4)
