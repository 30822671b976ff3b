"""vtn/synth.py's order videos: three coloured events in the order of the class, where events.json says."""

import json

import av
import numpy as np

from vtn.synth import ORDER_CLASSES, ORDER_COLOURS, make_order_dataset


def test_order_videos_show_their_class_colours_in_order_where_events_json_says(tmp_path):
    make_order_dataset(tmp_path, per_split={"train": 1}, seconds={"train": (3.5, 4.5)}, fps=10.0)
    events = json.loads((tmp_path / "events.json").read_text())
    assert sorted(events) == sorted(f"train/{c}/0000.mp4" for c in ORDER_CLASSES)
    names = list(ORDER_COLOURS)
    for name, (start, end) in events.items():
        with av.open(str(tmp_path / name)) as c:
            frames = [(float(f.time), f.to_ndarray(format="rgb24").astype(float).mean((0, 1))) for f in c.decode(video=0)]
        event = (end - start) / 3
        seen = []
        for t, rgb in frames:
            k = int((t - start) // event) if t >= start else -1
            if 0 <= k < 3 and abs(t - (start + (k + 0.5) * event)) < 0.3 * event:  # well inside event k
                seen.append(names[int(np.argmax(rgb))])
                assert rgb.max() > 100
            elif not start - 0.15 < t < end + 0.15:  # background: dim
                assert rgb.max() < 100
        assert list(dict.fromkeys(seen)) == name.split("/")[1].split("_")  # the class's colours, in order


def test_a_video_of_three_shortened_events_fills_itself_whatever_the_rounding():
    from vtn.synth import order_events

    seconds = 3.397607721497265  # seconds / 3 * 3 rounds below seconds: the events' room is -4e-16 s
    assert order_events(seconds, 0, event=2.0) == (0.0, 3 * (seconds / 3))
