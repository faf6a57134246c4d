"""NRRD and MetaImage headers, read and checked before ITK opens the files they describe.

ITK trusts these text headers: it opens whatever data file they name, and MetaIO (its .mha/.mhd
reader) returns an image made of whatever bytes it got from a cut or corrupt data block, after
printing "data not read completely" or "Uncompress failed" to stderr itself. So the header is read
here first, whole (up to ``MAX_HEADER_BYTES``), and the data it declares are checked against it.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

from medseg3d.errors import MedsegError

__all__ = ["MAX_HEADER_BYTES", "TextHeader", "check_metaimage_data", "data_files", "read_header"]

# A header is text of a few KB; one that does not end within this bound is refused, not cut.
MAX_HEADER_BYTES = 1 << 20
_NRRD_SUFFIXES = (".nrrd", ".nhdr")
_DATA_FILE_KEYS = ("data file", "datafile", "elementdatafile")
_SPRINTF = re.compile(r"%[-+ 0#]*\d*[diu]")
# MetaIO's MET_ValueTypeSize, by ElementType (the *_ARRAY types are left to ITK).
_MET_SIZES = {"MET_ASCII_CHAR": 1, "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2,
              "MET_INT": 4, "MET_UINT": 4, "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8,
              "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


@dataclass(frozen=True)
class TextHeader:
    """A NRRD or MetaImage header: its lines, and the byte where attached voxel data begin."""

    lines: list[str]
    end: int
    rest: list[str] | None  # the lines after it (names, for LIST); None past MAX_HEADER_BYTES


def read_header(path: Path) -> TextHeader:
    """The header of a NRRD (up to its first empty line) or MetaImage (up to ElementDataFile).

    MedsegError when it does not end within ``MAX_HEADER_BYTES``: a check that looked at part of a
    header would miss a data file named after the part (95 KB of comments, 1,300 unknown fields).
    """
    with open(path, "rb") as fh:
        raw = fh.read(MAX_HEADER_BYTES + 1)
    whole = len(raw) <= MAX_HEADER_BYTES
    nrrd = path.name.lower().endswith(_NRRD_SUFFIXES)
    lines: list[str] = []
    pos = 0
    while pos < len(raw):
        cut = raw.find(b"\n", pos)
        if cut < 0 and not whole:
            break  # a line cut by the bound
        stop = len(raw) if cut < 0 else cut + 1
        line = _text_line(raw[pos:stop], len(lines) + 1, path)
        pos = stop
        if nrrd and not line.strip():
            return TextHeader(lines, pos, _rest(raw, pos, whole))
        lines.append(line)
        if not nrrd and _key(line) in _DATA_FILE_KEYS:
            return TextHeader(lines, pos, _rest(raw, pos, whole))
    if whole:
        return TextHeader(lines, pos, [])
    raise MedsegError(f"header does not end within its first {MAX_HEADER_BYTES >> 20} MiB "
                      "(no end of header found); refusing to read it", path)


def _text_line(raw: bytes, number: int, path: Path) -> str:
    # teem ends a line at CR as well as LF, MetaIO at LF only: a lone CR would let the two
    # readers, and this check, see different lines (and different data files).
    line = raw.rstrip(b"\n")
    line = line[:-1] if line.endswith(b"\r") else line
    if b"\r" in line:
        raise MedsegError(f"header line {number} holds a carriage return inside it; only LF or "
                          "CR LF line ends are read", path)
    return line.decode("latin-1")


def _rest(raw: bytes, pos: int, whole: bool) -> list[str] | None:
    return raw[pos:].decode("latin-1").split("\n") if whole else None


def _key(line: str) -> str:
    key, sep, _ = line.partition("=" if "=" in line.split(":")[0] else ":")
    return key.strip().lower() if sep else ""


def _value(line: str) -> str:
    return line.partition("=" if "=" in line.split(":")[0] else ":")[2].strip()


def data_files(path: Path) -> list[str]:
    """Files a NRRD or MetaImage header names for its voxels (``[]`` when they are attached).

    Forms: one name; ``LIST`` followed by one name a line; a printf pattern (``slice%03d.raw 1 9
    1``), given here with its numbers as 0, since the folder part is what matters.
    """
    header = read_header(path)
    names: list[str] = []
    for i, line in enumerate(header.lines):
        if _key(line) in _DATA_FILE_KEYS:
            names += _named(_value(line), header.lines[i + 1:], header.rest, path)
    return names


def _named(value: str, after: list[str], rest: list[str] | None, path: Path) -> list[str]:
    words = value.split()
    if words and words[0].upper() == "LIST":
        if rest is None:
            raise MedsegError(f"its list of data files goes on past the first "
                              f"{MAX_HEADER_BYTES >> 20} MiB; refusing to read it", path)
        return [name.strip() for name in after + rest if name.strip()]
    if not words or words[0].upper() == "LOCAL":
        return []
    return [_SPRINTF.sub("0", words[0]) if "%" in value else value]


def check_metaimage_data(path: Path) -> None:
    """MedsegError when the voxel data a MetaImage header declares are missing, short or corrupt.

    Uncompressed: the bytes must be there. Compressed: the zlib stream must inflate, with a good
    Adler-32, to exactly the declared size (MetaIO itself ignores a failed inflate).
    """
    header = read_header(path)
    fields = {_key(line): _value(line) for line in header.lines}
    ndims, sizes = _integer(fields.get("ndims", "")), fields.get("dimsize", "").split()
    if ndims is None or not 1 <= ndims <= 4 or len(sizes) != ndims:  # else MetaIO prints to
        # stderr and ITK blames the file system ("No such file or directory")
        raise MedsegError(f"MetaImage header gives NDims {fields.get('ndims', '(none)')!r} and "
                          f"DimSize {fields.get('dimsize', '(none)')!r}: expected 1 to 4 sizes, "
                          "one per dimension", path)
    name = fields.get("elementdatafile", "")
    if name.upper() == "LOCAL":
        data, start = path, header.end
    elif name and "%" not in name and name.split()[0].upper() != "LIST":
        data, start = path.parent / name, 0
        if not data.is_file():
            raise MedsegError(f"data file {name!r} not found beside it", path)
    else:
        return  # no data file, or one of several: ITK reports what is missing
    shape, expected = _declared(fields)
    if expected is None or fields.get("binarydata", "true").lower() != "true":
        return
    skip = _integer(fields.get("headersize", "0"))
    where = "the file" if data == path else f"its data file {name!r}"
    if fields.get("compresseddata", "false").lower() == "true":
        if skip == 0:
            _check_inflates(data, start, _integer(fields.get("compresseddatasize", "")), expected,
                            where, path)
        return
    held = data.stat().st_size - start - max(skip or 0, 0)
    if held < expected:
        raise MedsegError(f"header declares shape {shape} ({expected:,} bytes of voxels) but "
                          f"{where} holds only {max(held, 0):,} bytes (truncated, or a bad "
                          "header)", path)


def _declared(fields: dict[str, str]) -> tuple[tuple[int, ...], int | None]:
    """The shape and byte count of the voxels a MetaImage header declares (None: not known)."""
    ndims = _integer(fields.get("ndims", ""))
    sizes = [_integer(word) for word in fields.get("dimsize", "").split()]
    channels = _integer(fields.get("elementnumberofchannels", "1"))
    itemsize = _MET_SIZES.get(fields.get("elementtype", "").upper())
    if not ndims or len(sizes) < ndims or itemsize is None or not channels or channels < 1:
        return (), None
    shape = tuple(size or 0 for size in sizes[:ndims])
    if min(shape) < 1:
        return shape, None  # ITK refuses it
    return shape, math.prod(shape) * channels * itemsize


def _integer(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _check_inflates(data: Path, start: int, compressed: int | None, expected: int, where: str,
                    path: Path) -> None:
    """Inflate the block (zlib or gzip, as MetaIO reads it), counting, never keeping, its bytes."""
    held = data.stat().st_size - start
    if compressed is not None and held < compressed:
        raise MedsegError(f"header declares {compressed:,} bytes of compressed voxels but {where} "
                          f"holds only {max(held, 0):,} bytes (truncated)", path)
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)
    left = held if compressed is None else compressed
    total = 0
    with open(data, "rb") as fh:
        fh.seek(start)
        try:
            while not inflater.eof and total <= expected:
                chunk = inflater.unconsumed_tail
                if not chunk:
                    chunk = fh.read(min(left, 1 << 20))
                    left -= len(chunk)
                if not chunk:
                    break
                total += len(inflater.decompress(chunk, 1 << 24))
        except zlib.error as exc:
            raise MedsegError(f"compressed voxel data are corrupt ({exc})", path) from exc
    if total > expected or (inflater.eof and total < expected):
        raise MedsegError(f"compressed voxel data inflate to {'more than ' * (total > expected)}"
                          f"{total:,} bytes, but the header declares {expected:,} (a bad header, "
                          "or corrupt data)", path)
    if not inflater.eof:
        raise MedsegError(f"compressed voxel data end before their zlib stream does ({where} is "
                          "truncated)", path)
