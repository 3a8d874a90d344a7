"""Tiny fixtures in the real layouts of OpenWebText and the image-text pair datasets.

Every builder writes into a given directory and returns what a correct reader must find, so
tests (and scripts/make_demo_text_pairs.py) compare shards against the inputs. Keys and texts
encode where each item came from.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import random
import tarfile
import zipfile
from pathlib import Path

_WORDS = ("the quick brown fox jumps over lazy dogs while seven wizards quietly hex "
          "bright vixens near a calm harbour under grey skies and running water").split()


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def owt_document(rng: random.Random, tag: str) -> str:
    """A document whose first line names it, with lines the cleaning must drop or keep."""
    lines = [f"Document {tag} first line.", "", sentence(rng, rng.randint(5, 40)), "---",
             "   " + sentence(rng, rng.randint(3, 20)) + "   ", "", "", "", sentence(rng, 8)]
    if rng.random() < 0.3:
        lines.insert(3, "bad\x00line")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- OpenWebText
def make_owt_slices(root, slices=(0, 1), members=2, docs=4, seed=0, bad_docs=True) -> dict:
    """`subsets/urlsf_subsetNN.tar` -> `openwebtext/urlsf_subsetNN-K_data.xz` -> `.txt` docs.

    Returns {slice: [(key, raw bytes), ...]} in file order. With bad_docs, slice 0's first
    member gets a document of invalid UTF-8 and one that is empty after cleaning.
    """
    root = Path(root)
    (root / "subsets").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    expected: dict = {}
    for s in slices:
        expected[s] = []
        with tarfile.open(root / "subsets" / f"urlsf_subset{s:02d}.tar", "w", format=tarfile.GNU_FORMAT) as outer:
            for k in range(1, members + 1):
                stem = f"urlsf_subset{s:02d}-{k}_data"
                buf = io.BytesIO()
                with tarfile.open(fileobj=buf, mode="w:xz") as inner:
                    for d in range(docs):
                        name = f"{d:07d}-{rng.getrandbits(64):016x}"
                        data = owt_document(rng, f"{s}.{k}.{d}").encode()
                        _tar_add(inner, f"{name}.txt", data)
                        expected[s].append((f"{stem}-{name}", data))
                    if bad_docs and s == slices[0] and k == 1:
                        for name, data in (("9999998-badutf8", b"caf\xe9 \xff\xfe broken\n"),
                                           ("9999999-empty", b"---\n\n   \n\x00\n")):
                            _tar_add(inner, f"{name}.txt", data)
                            expected[s].append((f"{stem}-{name}", data))
                _tar_add(outer, f"openwebtext/{stem}.xz", buf.getvalue())
    return expected


def make_owt_parquet(root, files=2, docs=5, seed=0) -> dict:
    """`plain_text/train-0000N-of-0000M.parquet` with a `text` column; {slice: [texts]}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    (root / "plain_text").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    expected = {}
    for i in range(files):
        texts = [owt_document(rng, f"p{i}.{d}") for d in range(docs)]
        pq.write_table(pa.table({"text": texts}), root / "plain_text" / f"train-{i:05d}-of-{files:05d}.parquet",
                       row_group_size=2)
        expected[i] = texts
    return expected


# ---------------------------------------------------------------- images
@functools.lru_cache(maxsize=256)
def jpeg_bytes(w=32, h=24, color=(200, 40, 40), mode="RGB", quality=90) -> bytes:
    from PIL import Image

    img = Image.new(mode, (w, h), color if mode != "CMYK" else (0, 200, 200, 0))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


@functools.lru_cache(maxsize=16)
def png_bytes(w=20, h=20, color=(10, 200, 10, 128)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGBA", (w, h), color).save(out, format="PNG")
    return out.getvalue()


def bomb_png(side=20000) -> bytes:
    """A tiny PNG whose header claims side x side pixels (a decompression bomb): built by hand,
    so making it costs nothing; a reader must refuse it from the header, before decoding."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
            + chunk(b"IEND", b""))


@functools.lru_cache(maxsize=1)
def _gzip_bomb() -> bytes:
    """50 MB of zeros in about 50 KB of gzip."""
    import gzip

    return gzip.compress(b"\0" * 50_000_000, compresslevel=9)


def _color(i: int) -> tuple:
    return ((37 * i) % 256, (91 * i) % 256, (151 * i) % 256)


# ---------------------------------------------------------------- COCO Karpathy
COLOURS = [("red", (220, 30, 30)), ("green", (30, 180, 40)), ("blue", (30, 60, 220)),
           ("yellow", (240, 220, 30)), ("purple", (140, 40, 170)), ("orange", (250, 140, 20)),
           ("black", (15, 15, 15)), ("white", (245, 245, 245))]
_COLOUR_CAPTIONS = ["a {} picture", "a plain {} image", "something that is all {}", "the colour {}",
                    "a photo filled with {}"]


def make_coco_karpathy(root, n_train=3, n_restval=2, n_val=2, n_test=2, captions=2, cmyk_one=True,
                       colours: bool = False) -> dict:
    """train2014.zip, val2014.zip and dataset_coco.json. Returns {split: [(cocoid, k, caption)]}
    for splits train (= train + restval), val, test. With `colours`, image i is filled with
    COLOURS[i % 8] and its captions name that colour (the demo: something a student can learn
    and carry over to unseen images); otherwise the captions only name the image's id."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    images = []
    zips = {"train2014": zipfile.ZipFile(root / "train2014.zip", "w"),
            "val2014": zipfile.ZipFile(root / "val2014.zip", "w")}
    cocoid = 9
    sentid = 0
    expected: dict = {"train": [], "val": [], "test": []}
    plan = ([("train", "train2014")] * n_train + [("restval", "val2014")] * n_restval
            + [("val", "val2014")] * n_val + [("test", "val2014")] * n_test)
    for i, (split, folder) in enumerate(plan):
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        mode = "CMYK" if (cmyk_one and i == 1) else "RGB"
        colour_name, rgb = COLOURS[i % len(COLOURS)] if colours else ("", _color(i))
        zips[folder].writestr(f"{folder}/{filename}", jpeg_bytes(40 + i, 30, rgb, mode=mode))
        sents = []
        for k in range(captions):
            raw = (_COLOUR_CAPTIONS[k % len(_COLOUR_CAPTIONS)].format(colour_name) if colours
                   else f"coco image {cocoid} caption {k}")
            sents.append({"raw": raw, "tokens": raw.split(), "imgid": i, "sentid": sentid})
            expected["train" if split in ("train", "restval") else split].append((cocoid, k, raw))
            sentid += 1
        images.append({"filepath": folder, "filename": filename, "cocoid": cocoid, "imgid": i,
                       "split": split, "sentids": [s["sentid"] for s in sents], "sentences": sents})
        cocoid += 7
    for z in zips.values():
        z.close()
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return expected


# ---------------------------------------------------------------- pixparse WebDataset mirrors
def make_wds_mirror(root, name="cc3m", split="train", shards=2, per_shard=3, png_one=True) -> list:
    """`{name}-{split}-NNNN.tar` with {key}.jpg/.txt/.json; returns [(key, caption, url)]."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    n = 0
    for s in range(shards):
        with tarfile.open(root / f"{name}-{split}-{s:04d}.tar", "w") as tar:
            for _ in range(per_shard):
                key = f"{s:04d}{n:05d}"
                caption = f"{name} {split} caption {n}"
                url = f"http://images.invalid/{name}/{n}.jpg"  # metadata only, never fetched
                img = png_bytes() if (png_one and n == 1) else jpeg_bytes(30, 20 + n, _color(n))
                _tar_add(tar, f"{key}.jpg", img)
                _tar_add(tar, f"{key}.txt", caption.encode())
                _tar_add(tar, f"{key}.json", json.dumps({"key": key, "caption": caption, "url": url,
                                                         "width": 30, "height": 20 + n}).encode())
                out.append((key, caption, url))
                n += 1
    return out


# ---------------------------------------------------------------- Flickr30k
def make_flickr30k(root, n_train=3, n_val=1, n_test=1, captions=5) -> dict:
    """flickr30k-images.zip + flickr_annotations_30k.csv (nlphuji layout); {split: [(img, k, cap)]}."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    expected: dict = {"train": [], "val": [], "test": []}
    rows = []
    with zipfile.ZipFile(root / "flickr30k-images.zip", "w") as z:
        plan = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
        for i, split in enumerate(plan):
            stem = str(1000092795 + i * 11)
            z.writestr(f"flickr30k-images/{stem}.jpg", jpeg_bytes(36, 28, _color(i + 3)))
            caps = [f"flickr {stem} caption {k}, with a comma" for k in range(captions)]
            rows.append({"raw": json.dumps(caps), "sentids": json.dumps(list(range(i * 5, i * 5 + 5))),
                         "split": split, "filename": f"{stem}.jpg", "img_id": str(i)})
            expected[split] += [(stem, k, c) for k, c in enumerate(caps)]
    with open(root / "flickr_annotations_30k.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["raw", "sentids", "split", "filename", "img_id"])
        w.writeheader()
        w.writerows(rows)
    return expected


# ---------------------------------------------------------------- URL lists
def write_url_list(path, rows: list[dict]) -> None:
    """rows of {column: value} as .csv, .tsv, .parquet or .jsonl, by the file's suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols = list(rows[0])
        pq.write_table(pa.table({c: [r[c] for r in rows] for c in cols}), path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if path.suffix == ".tsv" else ",")
            w.writeheader()
            w.writerows(rows)


# ---------------------------------------------------------------- a misbehaving image server
class ImageServer:
    """A local HTTP server on 127.0.0.1 with every kind of answer the downloader must survive.

    Paths: /good/N.jpg, /png/N.png, /tiny.jpg (1x1 placeholder), /html.jpg (HTML as image/jpeg),
    /bomb.png (decompression bomb), /gzip-bomb.jpg, /big.jpg (Content-Length over the limit),
    /big-stream.jpg (no length, endless), /404, /403, /429, /500, /flaky/ID.jpg (500 then 200),
    /slow.jpg (answers after `slow_s`), /dribble.jpg (one byte at a time), /reset.jpg (drops the
    connection), /loop-a (redirect loop), /to-file (redirect to file:), /redirect/N.jpg (to
    /good/N.jpg). `hits` counts requests per path.
    """

    def __init__(self, slow_s: float = 3.0):
        import http.server
        import threading

        self.hits: dict = {}
        self.slow_s = slow_s
        self._stop = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, status, body=b"", ctype="image/jpeg", headers=()):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # noqa: C901 - one branch per misbehaviour, on purpose

                p = self.path
                server.hits[p] = server.hits.get(p, 0) + 1
                try:
                    if p.startswith("/good/"):
                        n = int(p.split("/")[-1].split(".")[0])
                        self._send(200, jpeg_bytes(40 + n % 7, 30, _color(n)))
                    elif p.startswith("/png/"):
                        self._send(200, png_bytes(), "image/png")
                    elif p == "/tiny.jpg":
                        self._send(200, jpeg_bytes(1, 1))
                    elif p == "/html.jpg":
                        self._send(200, b"<!DOCTYPE html><html><body>gone</body></html>")
                    elif p == "/bomb.png":
                        self._send(200, bomb_png(), "image/png")
                    elif p == "/gzip-bomb.jpg":
                        self._send(200, _gzip_bomb(), headers=[("Content-Encoding", "gzip")])
                    elif p == "/big.jpg":
                        self.send_response(200)
                        self.send_header("Content-Length", str(500_000_000))
                        self.end_headers()
                        self.wfile.write(b"\xff\xd8\xff" + b"\0" * 1000)
                    elif p == "/big-stream.jpg":
                        self.send_response(200)
                        self.send_header("Connection", "close")
                        self.end_headers()
                        chunk = b"\xff" * 65536
                        for _ in range(2000):
                            if server._stop.is_set():
                                break
                            self.wfile.write(chunk)
                    elif p in ("/404", "/403", "/429", "/500"):
                        self._send(int(p[1:]), b"no", "text/plain", [("Retry-After", "0")])
                    elif p.startswith("/flaky/"):
                        if server.hits[p] == 1:
                            self._send(500, b"try again", "text/plain")
                        else:
                            n = int(p.split("/")[-1].split(".")[0])
                            self._send(200, jpeg_bytes(33, 22, _color(n)))
                    elif p == "/slow.jpg":
                        server._stop.wait(server.slow_s)
                        self._send(200, jpeg_bytes())
                    elif p == "/dribble.jpg":
                        body = jpeg_bytes()
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        for i in range(len(body)):
                            if server._stop.wait(0.05):
                                break
                            self.wfile.write(body[i:i + 1])
                            self.wfile.flush()
                    elif p == "/reset.jpg":
                        import socket
                        import struct

                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        self.connection.close()
                    elif p == "/loop-a":
                        self._send(302, b"", headers=[("Location", "/loop-b")])
                    elif p == "/loop-b":
                        self._send(302, b"", headers=[("Location", "/loop-a")])
                    elif p == "/to-file":
                        self._send(302, b"", headers=[("Location", "file:///etc/passwd")])
                    elif p.startswith("/redirect/"):
                        self._send(301, b"", headers=[("Location", "/good/" + p.split("/")[-1])])
                    else:
                        self._send(404, b"unknown", "text/plain")
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
