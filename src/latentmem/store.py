"""Object storage for memory states, through fsspec: a local folder or any S3-compatible bucket.

A memory server with several replicas (serving.py) keeps every state in one shared store and
commits each write to it before acknowledging it. Two replicas may hold the same memory (a
request routed elsewhere while its replica was busy, a replica restarted, a network partition),
so commits are fenced: every object carries a *version* token and a *generation* number, and
`put(key, data, expected=version)` succeeds only if the object is still at the version the caller
read (or still absent, for `expected=None`). A replica that read generation g and commits after
another replica committed g+1 gets `StaleVersion`, and the newer memory stays.

    store = open_store("s3://bucket/prefix")        # s3fs; endpoint from storage_options or
                                                    # FSSPEC_S3_ENDPOINT_URL / AWS_ENDPOINT_URL
    store = open_store("/var/lib/latentmem/states")  # a local (or NFS-free, one-machine) folder

Where the compare-and-swap comes from:

- **S3** (AWS, MinIO, Ceph RGW, moto, ...): conditional PUT, `If-Match: <ETag>` over an existing
  object and `If-None-Match: *` for a new one. The store checks and writes in one step; S3
  answers 412 (or 409 for two conditional writes racing) to the loser. The generation number and
  the write counters travel as object metadata.
- **Local folder** (`file://` or a path): an exclusive `flock` on a lock file per object while the
  version is compared and the new data is written to a temporary file, flushed and renamed over
  the object. The version is the file's (inode, mtime_ns, size), which every rename changes.
  Good for every process on one machine; not for a network file system whose locks are unreliable.

Any other fsspec protocol is refused with a clear error: without an atomic conditional write
there is no safe fencing (a lease needs one too, to be taken safely).
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .ltm.files import write_atomic


class StaleVersion(RuntimeError):
    """A commit over a version that is no longer the store's: another writer committed first."""

    def __init__(self, key: str, expected: str | None):
        super().__init__(f"{key}: the stored object is no longer at version {expected!r} (committed elsewhere first)")
        self.key, self.expected = key, expected


class StoreError(RuntimeError):
    """The store could not be reached or refused the request (not a version conflict)."""


@dataclass
class Head:
    """What the store knows of an object without its bytes."""

    version: str  # the token a commit over this object must name
    generation: int  # commits so far (1 for the first)
    size: int
    modified: float  # seconds since the epoch
    meta: dict[str, str] = field(default_factory=dict)  # small strings the writer attached


class ObjectStore:
    """The interface: keys are `/`-separated relative paths under the store's root."""

    url: str

    def head(self, key: str) -> Head | None:
        raise NotImplementedError

    def get(self, key: str) -> tuple[bytes, Head] | None:
        """The object's bytes and the head they belong to (one consistent read), or None."""
        raise NotImplementedError

    def put(self, key: str, data: bytes, *, expected: str | None, meta: dict[str, str] | None = None) -> Head:
        """Commit `data` if the object is at version `expected` (absent, for None); else `StaleVersion`."""
        raise NotImplementedError

    def list(self, prefix: str) -> list[str]:
        """Keys under `prefix` (a folder, no trailing slash needed), one level down, sorted."""
        raise NotImplementedError


def open_store(url: str | os.PathLike, storage_options: dict | None = None) -> ObjectStore:
    """The store at `url`: a local path or `file://` URL, or `s3://bucket/prefix` (needs s3fs)."""
    url = os.fspath(url)
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol in ("file", "local"):
        return LocalStore(url.split("://", 1)[-1])
    if protocol in ("s3", "s3a"):
        return S3Store(url, storage_options or {})
    raise ValueError(
        f"store {url!r}: protocol {protocol!r} has no conditional write latentmem knows how to use, so commits "
        "could not be fenced; use a local folder or an S3-compatible bucket (s3://bucket/prefix)"
    )


# --- a local folder ---------------------------------------------------------------------------
class LocalStore(ObjectStore):
    META = ".meta.json"  # next to each object: generation and the writer's meta (advisory for listings)

    def __init__(self, root: str | os.PathLike):
        import fsspec

        self.fs = fsspec.filesystem("file")
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise ValueError(f"key {key!r} is outside the store")
        return path

    @staticmethod
    def _version(stat: os.stat_result) -> str:
        return f"{stat.st_ino}:{stat.st_mtime_ns}:{stat.st_size}"

    def _head(self, path: Path, stat: os.stat_result) -> Head:
        try:
            info = json.loads(path.with_name(path.name + self.META).read_text())
        except (OSError, ValueError):
            info = {}
        meta = info.get("meta") if isinstance(info.get("meta"), dict) else {}
        generation = info.get("generation") if info.get("version") == self._version(stat) else None
        return Head(self._version(stat), generation if isinstance(generation, int) else 0, stat.st_size,
                    stat.st_mtime, meta)  # fmt: skip

    def head(self, key: str) -> Head | None:
        path = self._path(key)
        try:
            return self._head(path, path.stat())
        except FileNotFoundError:
            return None

    def get(self, key: str) -> tuple[bytes, Head] | None:
        path = self._path(key)
        try:
            with open(path, "rb") as f:  # one open: the bytes and the stat are of the same file
                stat = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            return None
        return data, self._head(path, stat)

    def put(self, key: str, data: bytes, *, expected: str | None, meta: dict[str, str] | None = None) -> Head:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".{path.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
            try:
                current = path.stat()
            except FileNotFoundError:
                current = None
            if (None if current is None else self._version(current)) != expected:
                raise StaleVersion(key, expected)
            generation = (self._head(path, current).generation if current else 0) + 1
            write_atomic(path, data)  # durable: fsynced, then the folder
            stat = path.stat()
            info = {"version": self._version(stat), "generation": generation, "meta": dict(meta or {})}
            write_atomic(path.with_name(path.name + self.META), json.dumps(info).encode(), durable=False)
            return Head(self._version(stat), generation, stat.st_size, stat.st_mtime, dict(meta or {}))

    def list(self, prefix: str) -> list[str]:
        folder = self._path(prefix) if prefix.strip("/") else self.root
        try:
            names = os.listdir(folder)
        except (FileNotFoundError, NotADirectoryError):
            return []
        base = prefix.strip("/")
        return sorted(
            f"{base}/{name}" if base else name
            for name in names
            if not name.startswith(".") and not name.endswith(self.META) and (folder / name).is_file()
        )


# --- S3 and S3-compatible stores -----------------------------------------------------------------
class S3Store(ObjectStore):
    def __init__(self, url: str, storage_options: dict):
        try:
            import fsspec
            from fsspec.asyn import sync
        except ModuleNotFoundError as err:  # pragma: no cover - fsspec comes with the base install
            raise ModuleNotFoundError("an s3:// store needs fsspec and s3fs: pip install 'latentmem[ray]'") from err
        try:
            fs, path = fsspec.url_to_fs(url, **storage_options)
        except (ImportError, ValueError) as err:
            raise ModuleNotFoundError(f"an s3:// store needs s3fs: pip install 'latentmem[ray]' ({err})") from err
        self.fs, self._sync, self.url = fs, sync, url
        self.bucket, _, prefix = path.strip("/").partition("/")
        self.prefix = f"{prefix}/" if prefix else ""

    def _run(self, coroutine_function, *args):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self._sync(self.fs.loop, coroutine_function, *args)
        except StaleVersion:
            raise
        except ClientError as err:
            raise StoreError(f"{self.url}: {err}") from err
        except (BotoCoreError, OSError) as err:
            raise StoreError(f"{self.url}: {err}") from err

    async def _client(self):
        await self.fs.set_session()
        return await self.fs.get_s3(self.bucket)

    def _head_of(self, response: dict) -> Head:
        meta = dict(response.get("Metadata") or {})
        generation = meta.pop("generation", "0")
        return Head(
            response["ETag"], int(generation) if generation.isdigit() else 0, int(response.get("ContentLength", 0)),
            response["LastModified"].timestamp(), meta,
        )  # fmt: skip

    def head(self, key: str) -> Head | None:
        async def go():
            from botocore.exceptions import ClientError

            s3 = await self._client()
            try:
                return self._head_of(await s3.head_object(Bucket=self.bucket, Key=self.prefix + key))
            except ClientError as err:
                if _code(err) in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise

        return self._run(go)

    def get(self, key: str) -> tuple[bytes, Head] | None:
        async def go():
            from botocore.exceptions import ClientError

            s3 = await self._client()
            try:
                response = await s3.get_object(Bucket=self.bucket, Key=self.prefix + key)
            except ClientError as err:
                if _code(err) in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
            async with response["Body"] as body:  # the bytes of exactly the version whose ETag this is
                data = await body.read()
            return data, self._head_of({**response, "ContentLength": len(data)})

        return self._run(go)

    def put(self, key: str, data: bytes, *, expected: str | None, meta: dict[str, str] | None = None) -> Head:
        async def go():
            from botocore.exceptions import ClientError

            s3 = await self._client()
            condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
            generation = 1
            if expected is not None:  # the generation it was read at; the ETag condition is what fences
                current = await s3.head_object(Bucket=self.bucket, Key=self.prefix + key)
                generation = self._head_of(current).generation + 1
            metadata = {**(meta or {}), "generation": str(generation)}
            try:
                response = await s3.put_object(
                    Bucket=self.bucket, Key=self.prefix + key, Body=data, Metadata=metadata, **condition
                )
            except ClientError as err:
                # 412: not at that version (or present, for If-None-Match); 409: a conditional write
                # raced another one on the same key; 404: the object went away under If-Match.
                if _code(err) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404"):
                    raise StaleVersion(key, expected) from err
                raise
            return Head(response["ETag"], generation, len(data), _now(), dict(meta or {}))

        try:
            return self._run(go)
        except StoreError as err:  # head_object above found nothing: the object is not at `expected`
            if expected is not None and "404" in str(err):
                raise StaleVersion(key, expected) from err
            raise

    def list(self, prefix: str) -> list[str]:
        async def go():
            s3 = await self._client()
            base = self.prefix + prefix.strip("/") + "/" if prefix.strip("/") else self.prefix
            keys, token = [], None
            while True:
                extra = {"ContinuationToken": token} if token else {}
                response = await s3.list_objects_v2(Bucket=self.bucket, Prefix=base, Delimiter="/", **extra)
                keys += [item["Key"][len(self.prefix) :] for item in response.get("Contents", [])]
                if not response.get("IsTruncated"):
                    return sorted(keys)
                token = response["NextContinuationToken"]

        return self._run(go)


def _code(err) -> str:
    return str(err.response.get("Error", {}).get("Code", "")) or str(
        err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
    )


def _now() -> float:
    import time

    return time.time()
