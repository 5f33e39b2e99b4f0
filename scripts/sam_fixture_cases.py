"""The prompt cases of the SAM parity fixtures (scripts/sam_fixtures.py, vit_b-style, and
scripts/sam_fixtures_vit_t.py, MobileSAM): box, points, box+points and mask+points, single and
multimask, in original-image pixels of the Kvasir fixture image (the polyp is left of centre).
Writes the predictor's IoU, subsampled low-res logits and masks; returns the cases (the keyword
arguments given to `predictor.predict`) and the low-res logits per case."""
import numpy as np


def run_prompt_cases(predictor, save_npy, save_mask_png):
    box = np.array([30, 25, 110, 100], dtype=np.float32)
    pts = np.array([[70, 60], [140, 20]], dtype=np.float32)
    lbl = np.array([1, 0], dtype=np.int64)
    cases = {"box": dict(box=box), "points": dict(point_coords=pts, point_labels=lbl),
             "box_points": dict(box=box, point_coords=pts, point_labels=lbl)}
    outputs = {}
    for name, kw in list(cases.items()) + [("mask_points", None)]:
        if kw is None:
            kw = dict(point_coords=pts[:1], point_labels=lbl[:1],
                      mask_input=outputs["box"]["single_low"])
            cases[name] = kw
        res = {}
        for mm in (False, True):
            masks, iou, low = predictor.predict(multimask_output=mm, **kw)
            tag = "multi" if mm else "single"
            res[tag + "_low"] = low
            save_npy(f"{name}_{tag}_iou.npy", iou.astype(np.float32))
            step = 8 if mm else 4
            save_npy(f"{name}_{tag}_low_sub{step}.npy", low[:, ::step, ::step].astype(np.float32))
            for i, m in enumerate(masks):
                save_mask_png(f"{name}_{tag}_mask{i}.png", m)
            assert low.std() > 0.3, f"{name}/{tag}: logits too flat ({low.std():.3f})"
            frac = float(masks.mean())
            assert 0.03 < frac < 0.97, f"{name}/{tag}: degenerate masks (fg {frac:.3f})"
        if name == "box":  # full logits: they are the mask_input of "mask_points"
            save_npy("box_single_low.npy", res["single_low"].astype(np.float32))
        outputs[name] = res
    a, b = outputs["box"]["single_low"], outputs["points"]["single_low"]
    assert np.abs(a - b).mean() > 0.1 * a.std(), "box and points give the same logits"
    return cases, outputs
