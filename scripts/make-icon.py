#!/usr/bin/env python3
# Writes assets/medmine.png: python3 scripts/make-icon.py assets/medmine.png
# medmine's icon, 256x256 RGBA PNG, drawn with the standard library only:
# a dark rounded tile, two grey lung fields, one outlined in orange (a segmentation contour).
import zlib, struct, math, sys
N = 256
def inside_lung(x, y, cx):
    # a lung field: an ellipse with the inner lower corner cut off
    dx, dy = (x - cx) / 46.0, (y - 132) / 78.0
    return dx * dx + dy * dy <= 1.0
def dist_edge(x, y, cx):
    dx, dy = (x - cx) / 46.0, (y - 132) / 78.0
    return abs(math.sqrt(dx * dx + dy * dy) - 1.0) * 60
rows = []
for y in range(N):
    row = bytearray([0])
    for x in range(N):
        # rounded tile, radius 40, 1 px antialias
        r = 40
        qx = max(r - x, x - (N - 1 - r), 0)
        qy = max(r - y, y - (N - 1 - r), 0)
        d = math.hypot(qx, qy) - r
        a = max(0.0, min(1.0, 0.5 - d))
        col = (24, 38, 64)
        if inside_lung(x, y, 82) or inside_lung(x, y, 174):
            col = (196, 204, 214)
        if dist_edge(x, y, 174) < 4.0:
            col = (255, 140, 0)
        if 120 <= x <= 136 and 40 <= y <= 110:  # trachea
            col = (150, 160, 175)
        row += bytes(col) + bytes([int(a * 255 + 0.5)])
    rows.append(bytes(row))
raw = b"".join(rows)
def chunk(t, d):
    c = t + d
    return struct.pack(">I", len(d)) + c + struct.pack(">I", zlib.crc32(c) & 0xFFFFFFFF)
png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", N, N, 8, 6, 0, 0, 0)) \
    + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
open(sys.argv[1], "wb").write(png)
