"""Files crafted to break naive readers (for the data and evaluation tests)."""

from __future__ import annotations

import io
import pathlib
import struct
import zlib

import numpy as np
import PIL.Image


def write_bomb_png(path: pathlib.Path, width: int = 100_000, height: int = 100_000) -> None:
  """A tiny, valid-looking PNG whose header claims width x height RGB pixels.

  A small real PNG with its IHDR size fields rewritten (and the chunk CRC fixed), so
  PIL's header parsing succeeds and its decompression-bomb check fires.
  """
  buf = io.BytesIO()
  PIL.Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, format="png")
  data = bytearray(buf.getvalue())
  assert data[12:16] == b"IHDR"
  data[16:24] = struct.pack(">II", width, height)
  data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(bytes(data))


def write_bomb_npy(path: pathlib.Path, shape: tuple[int, ...]) -> None:
  """A .npy file whose header claims `shape` (uint8) but holds 100 bytes."""
  from numpy.lib import format as npy_format  # pylint: disable=import-outside-toplevel
  buf = io.BytesIO()
  npy_format.write_array_header_1_0(
      buf, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
  buf.write(b"\0" * 100)
  path.write_bytes(buf.getvalue())
