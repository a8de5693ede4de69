"""Draws a schematic picture of a workflow file (groups, nodes with their sockets, links) with Pillow.

Not the ComfyUI editor's rendering: a stand-in for the docs where no editor screenshot was made.

    python tools/draw_workflow.py workflows/layer_edit.json docs/layer_edit.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

TITLE_H, SOCKET_H, SCALE, MARGIN = 30, 20, 0.6, 40


def _font(size):
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def draw(workflow: dict) -> Image.Image:
    nodes = {n["id"]: n for n in workflow["nodes"]}
    boxes = [(n["pos"][0], n["pos"][1] - TITLE_H, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in nodes.values()] + [(g["bounding"][0], g["bounding"][1], g["bounding"][0] + g["bounding"][2],
                                          g["bounding"][1] + g["bounding"][3]) for g in workflow["groups"]]
    x0, y0 = min(b[0] for b in boxes) - MARGIN, min(b[1] for b in boxes) - MARGIN
    x1, y1 = max(b[2] for b in boxes) + MARGIN, max(b[3] for b in boxes) + MARGIN

    def p(x, y):
        return ((x - x0) * SCALE, (y - y0) * SCALE)

    image = Image.new("RGB", (int((x1 - x0) * SCALE), int((y1 - y0) * SCALE)), "#202020")
    d = ImageDraw.Draw(image)
    title, small = _font(13), _font(10)
    for g in workflow["groups"]:
        gx, gy, gw, gh = g["bounding"]
        d.rectangle([*p(gx, gy), *p(gx + gw, gy + gh)], outline=g.get("color", "#3f789e"), width=2)
        d.text(p(gx + 8, gy + 6), g["title"], fill="#aaaaaa", font=title)

    def socket(node, slot, output):
        x = node["pos"][0] + (node["size"][0] if output else 0)
        return p(x, node["pos"][1] + 10 + slot * SOCKET_H)

    for _id, src, s_slot, dst, d_slot, kind in workflow["links"]:
        a, b = socket(nodes[src], s_slot, True), socket(nodes[dst], d_slot, False)
        mid = (a[0] + b[0]) / 2
        d.line([a, (mid, a[1]), (mid, b[1]), b], fill="#7fa7d0", width=2)
    for n in nodes.values():
        x, y = n["pos"]
        w, h = n["size"]
        note = n["type"] == "Note"
        d.rectangle([*p(x, y - TITLE_H), *p(x + w, y + h)], fill="#432" if note else "#353535", outline="#555555")
        d.rectangle([*p(x, y - TITLE_H), *p(x + w, y)], fill="#653" if note else "#2a2a2a")
        d.text(p(x + 8, y - TITLE_H + 7), n.get("title") or n["type"], fill="#dddddd", font=title)
        if note:
            d.multiline_text(p(x + 8, y + 6), str(n["widgets_values"][0]), fill="#cccccc", font=small)
            continue
        for slot, inp in enumerate(n.get("inputs", [])):
            d.text(p(x + 10, y + 4 + slot * SOCKET_H), inp["name"], fill="#bbbbbb", font=small)
        for slot, out in enumerate(n.get("outputs", [])):
            tw = d.textlength(out["name"], font=small)
            px, py = p(x + w - 10, y + 4 + slot * SOCKET_H)
            d.text((px - tw, py), out["name"], fill="#bbbbbb", font=small)
    return image


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workflow", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    draw(json.loads(args.workflow.read_text(encoding="utf-8"))).save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
