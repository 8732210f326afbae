"""The tar reader of reinforced shards: ``(name, bytes)`` of each regular member, in order, with little Python work.

Why not Python's ``tarfile`` (what WebDataset's ``tariterators.tar_file_iterator`` uses): ``tarfile`` decodes every
header field into a ``TarInfo`` in pure Python (~25 us per member here), and a reinforced sample has three members
(image, label, records), so on small images the tar headers cost as much as decoding and replaying the image
(``benchmarks/train_epoch_cost.py --profile``; ``benchmarks/loader_throughput.py --compare-tar-readers`` times both
readers in the same loader). This reader parses only what the loader needs (name, size, type, header checksum) from
each 512-byte header and reads the data with one call; ``tarfile`` still writes the shards.

Formats: ustar and GNU headers, pax extended headers (``path``, ``size``) and GNU long names, as ``tarfile`` writes
them. Header checksums are verified (``tarfile`` in stream mode ends the archive quietly at a bad header; this reader
raises), and a member cut short raises, each :class:`TarFormatError` naming the byte offset.
"""
import os
from typing import Any, Iterator, Optional, Tuple

import numpy as np

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = (b'0', b'\0', b'7')
_CHKSUM_SPACES = 8 * 32  # the checksum field counts as eight spaces


class TarFormatError(ValueError):
    """A tar stream that is truncated or whose headers do not check out (the message gives the byte offset)."""


def _number(field: bytes, what: str, offset: int) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 (members > 8 GiB): reinforce.py never writes them
        raise TarFormatError(f'unsupported base-256 {what} in the tar header at byte {offset}')
    text = field.split(b'\0', 1)[0].strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise TarFormatError(f'garbled {what} field {field!r} in the tar header at byte {offset}') from None


def _check_header(header: bytes, offset: int) -> None:
    stored = _number(header[148:156], 'checksum', offset)
    block = np.frombuffer(header, dtype=np.uint8)
    unsigned = int(block.sum()) - int(block[148:156].sum()) + _CHKSUM_SPACES
    if stored == unsigned:
        return
    signed_block = block.view(np.int8)
    signed = int(signed_block.sum()) - int(signed_block[148:156].sum()) + _CHKSUM_SPACES
    if stored != signed:
        raise TarFormatError(f'tar header checksum mismatch at byte {offset} (corrupted shard)')


def _pax_records(data: bytes, offset: int) -> dict:
    """``{key: value}`` of a pax extended header (records ``"<length> <key>=<value>\\n"``)."""
    out = {}
    pos = 0
    while pos < len(data) and data[pos:pos + 1] not in (b'\0', b''):
        space = data.find(b' ', pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarFormatError(f'garbled pax header at byte {offset}') from None
        if space < 0 or length <= 0:
            raise TarFormatError(f'garbled pax header at byte {offset}')
        key, _, value = data[space + 1:pos + length - 1].partition(b'=')
        out[key] = value
        pos += length
    return out


def _read_exactly(stream: Any, n: int, offset: int, name: bytes) -> bytes:
    data = stream.read(n)
    if len(data) < n:
        raise TarFormatError(f'member {name.decode("utf-8", "replace")} cut short at byte {offset + len(data)} '
                             f'({n - len(data)} bytes missing)')
    return data


def _skip(stream: Any, n: int, seekable: bool, offset: int, name: bytes) -> None:
    if seekable:
        stream.seek(n, os.SEEK_CUR)
    else:
        _read_exactly(stream, n, offset, name)


def iter_tar_members(stream: Any, skip_samples: int = 0) -> Iterator[Tuple[str, bytes]]:
    """``(name, data)`` of the regular files of a tar stream, in order.

    Args:
        stream: a binary file-like object (``read``; ``seek`` is used to pass over skipped members when it is
            seekable).
        skip_samples: members of the first ``skip_samples`` samples (WebDataset keys: the basename up to its first
            dot) are passed over unread; members whose name starts with ``__`` (shard metadata, not a sample) are
            always returned.

    Raises:
        TarFormatError: a truncated or corrupted archive.
    """
    seekable = bool(getattr(stream, 'seekable', lambda: False)())
    offset = 0
    long_name: Optional[bytes] = None
    pax: dict = {}
    key, samples_seen = None, 0
    while True:
        header = stream.read(BLOCK)
        if not header:
            return  # data ends without the end-of-archive blocks: the caller's sample count decides
        if len(header) < BLOCK:
            raise TarFormatError(f'tar header cut short at byte {offset}')
        if header == _ZERO_BLOCK:
            return
        _check_header(header, offset)
        typeflag = header[156:157]
        size = int(pax[b'size']) if b'size' in pax else _number(header[124:136], 'size', offset)
        offset += BLOCK
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        if typeflag not in _REGULAR:
            data = _read_exactly(stream, padded, offset, header[:100].split(b'\0', 1)[0])
            offset += padded
            if typeflag == b'L':
                long_name = data[:size].split(b'\0', 1)[0]
            elif typeflag == b'x':
                pax = _pax_records(data[:size], offset - padded)
            continue  # directories, links, global pax headers: not members of a sample
        if b'path' in pax:
            name = pax[b'path']
        elif long_name is not None:
            name = long_name
        else:
            name = header[:100].split(b'\0', 1)[0]
            if header[257:262] == b'ustar':
                prefix = header[345:500].split(b'\0', 1)[0]
                if prefix:
                    name = prefix + b'/' + name
        long_name, pax = None, {}
        if skip_samples and not name.startswith(b'__'):
            member_key = name.rsplit(b'/', 1)[-1].split(b'.', 1)[0]
            if member_key != key:
                if key is not None:
                    samples_seen += 1
                key = member_key
            if samples_seen < skip_samples:
                _skip(stream, padded, seekable, offset, name)
                offset += padded
                continue
            skip_samples = 0  # past the skipped samples: no more key tracking
        data = _read_exactly(stream, padded, offset, name)
        offset += padded
        yield name.decode('utf-8', 'replace'), data[:size] if padded != size else data
