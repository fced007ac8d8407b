"""Local and cloud paths (gs://, s3://, ... through etils.epath / fsspec and tensorstore) and their client settings.

    storage.configure()                       # once per process, before gcsfs is imported (startup.start does it)
    storage.check_readable("tokenizer_path", path)   # ConfigError naming the key and the path
    storage.check_writable("base_output_directory", run_dir)

Clients and what points each at a GCS emulator: gcsfs (behind epath) and google-cloud-storage (tensorboardX) read
STORAGE_EMULATOR_HOST, gcsfs also FSSPEC_GS_TOKEN / NO_GCE_CHECK / GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT; tensorstore
(Orbax's arrays) reads TENSORSTORE_GCS_HTTP_URL and GOOGLE_AUTH_TOKEN_FOR_TESTING; array_record's GCS reader
(google-cloud-cpp) reads CLOUD_STORAGE_EMULATOR_ENDPOINT. `configure` derives all of them from STORAGE_EMULATOR_HOST
alone (values already set win; a "host:port" value gains its http://); without it nothing is set and the clients
use application-default credentials.

Kept free of JAX so the config checks and the input pipeline can import it.
"""

import os
import sys
from typing import Mapping, MutableMapping, Optional

from etils import epath

from MaxText.config.declare import ConfigError

EMULATOR_VAR = "STORAGE_EMULATOR_HOST"

# fsspec's `FSSPEC_<protocol>_<kwarg>` form; fsspec reads it when it is imported. Always off, also on real GCS:
# tensorstore writes Orbax's arrays behind gcsfs's back, and a cached listing would hide them (or a new step).
_LISTINGS_CACHE_VAR = "FSSPEC_GS_USE_LISTINGS_CACHE"


def emulator_url(host: str) -> str:
  """STORAGE_EMULATOR_HOST as an http URL (the clients accept "host:port" or "http://host:port")."""
  host = host.rstrip("/")
  return host if host.startswith(("http://", "https://")) else f"http://{host}"


def emulator_env(host: str) -> dict[str, str]:
  """Every variable that points the clients at the GCS emulator at `host`, with test credentials."""
  url = emulator_url(host)
  return {
      EMULATOR_VAR: url,  # google-cloud-storage (Orbax's GC, tensorboardX) needs the scheme
      "FSSPEC_GS_TOKEN": "anon",  # gcsfs: no credential lookup
      "NO_GCE_CHECK": "true",  # google-auth: never probe the metadata server
      # gcsfs's zonal/HNS bucket probe is a gRPC call an emulator does not answer: each call would wait 60 s.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      _LISTINGS_CACHE_VAR: "false",
      "TENSORSTORE_GCS_HTTP_URL": url,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: a fixed bearer token instead of credentials
      "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,  # array_record / google-cloud-cpp
  }


def configure(environ: Optional[MutableMapping[str, str]] = None) -> dict[str, str]:
  """Sets the client variables STORAGE_EMULATOR_HOST implies (unless already set); returns what it set.

  Call before gcsfs is imported (its ZB/HNS switch is read at import); fsspec's config is also patched in place
  when fsspec is already loaded. Idempotent.
  """
  environ = os.environ if environ is None else environ
  wanted = {_LISTINGS_CACHE_VAR: "false"}
  host = environ.get(EMULATOR_VAR, "")
  if host and host != "default":
    wanted = emulator_env(host)
  added = {k: v for k, v in wanted.items() if k not in environ}
  if host and host != "default" and environ[EMULATOR_VAR] != wanted[EMULATOR_VAR]:
    added[EMULATOR_VAR] = wanted[EMULATOR_VAR]  # "host:port" -> "http://host:port"
  environ.update(added)
  if environ is os.environ and "fsspec.config" in sys.modules:
    _patch_fsspec_conf(environ)
  return added


def _patch_fsspec_conf(environ: Mapping[str, str]):
  import fsspec.config  # pylint: disable=import-outside-toplevel

  gs = fsspec.config.conf.setdefault("gs", {})
  gs.setdefault("use_listings_cache", environ.get(_LISTINGS_CACHE_VAR, "false").lower() == "true")
  if "FSSPEC_GS_TOKEN" in environ:
    gs.setdefault("token", environ["FSSPEC_GS_TOKEN"])


def subprocess_env(base: Optional[Mapping[str, str]] = None, **extra: str) -> dict[str, str]:
  """A copy of `base` (default os.environ) plus `extra`, with the emulator variables derived (for child processes)."""
  env = dict(os.environ if base is None else base)
  env.update(extra)
  configure(env)
  return env


# ----------------------------------------------------------------------------- paths


def is_remote(path) -> bool:
  """True for a URL with a scheme other than file:// (gs://, s3://, ...)."""
  text = os.fspath(path) if not isinstance(path, str) else path
  return "://" in text and not text.startswith("file://")


def scheme(path) -> str:
  text = str(path)
  return text.split("://", 1)[0] if "://" in text else ""


def as_path(path) -> epath.Path:
  """An epath.Path: local paths and file:// as pathlib paths, URLs through fsspec."""
  text = str(path)
  if text.startswith("file://"):
    text = text[len("file://") :]
  return epath.Path(text)


def join(base, *parts) -> str:
  """`base/part/...` as a string, keeping a URL's scheme (os.path.join would not on Windows-style paths)."""
  text = str(base).rstrip("/") if str(base) not in ("/", "") else str(base)
  for part in parts:
    part = str(part).strip("/")
    if part:
      text = f"{text}/{part}" if text and not text.endswith("/") else f"{text}{part}"
  return text


def bucket(path) -> str:
  """`gs://bucket` of a URL (empty for a local path)."""
  text = str(path)
  if not is_remote(text):
    return ""
  name = text.split("://", 1)[1].split("/", 1)[0]
  return f"{scheme(text)}://{name}"


def exists(path) -> bool:
  return as_path(path).exists()


def absolute(path) -> str:
  """URLs as they are; local paths made absolute (Orbax and tensorstore want absolute paths)."""
  return str(path) if is_remote(path) else os.path.abspath(str(as_path(path)))


# ----------------------------------------------------------------------------- errors


def _short(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def describe_failure(path, error: Optional[BaseException] = None) -> str:
  """Why `path` cannot be used: missing bucket, missing object, no credentials, or the client's own words."""
  text = str(path)
  if error is not None and _looks_like_credentials(error):
    return f"no credentials for {text} ({_short(error)}); {credentials_hint(text)}"
  if is_remote(text):
    root = bucket(text)
    try:
      bucket_ok = as_path(root).exists()
    except Exception as e:  # pylint: disable=broad-exception-caught
      if _looks_like_credentials(e):
        return f"no credentials for {text} ({_short(e)}); {credentials_hint(text)}"
      return f"cannot reach {root} ({_short(e)}); {credentials_hint(text)}"
    if not bucket_ok:
      return f"bucket {root} does not exist (or these credentials cannot see it)"
  if error is not None and not isinstance(error, FileNotFoundError):
    return f"cannot access {text} ({_short(error)})"
  return f"{text} does not exist"


def credentials_hint(path) -> str:
  if scheme(path) == "gs":
    if os.environ.get(EMULATOR_VAR):
      return f"{EMULATOR_VAR}={os.environ[EMULATOR_VAR]} is set: is the emulator running?"
    return "run `gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS"
  return f"check the credentials of the {scheme(path)}:// client"


_CREDENTIAL_WORDS = ("credential", "defaultcredentialserror", "refresherror", "401", "403", "unauthorized", "forbidden")


def _looks_like_credentials(e: BaseException) -> bool:
  text = f"{type(e).__name__} {e}".lower()
  return any(w in text for w in _CREDENTIAL_WORDS)


_credentials_checked: dict[str, Optional[str]] = {}


def credentials_problem(path) -> Optional[str]:
  """Why gs:// cannot be used without an emulator (no application-default credentials), else None; cached.

  Checked before any gcsfs call: without credentials gcsfs falls back to anonymous access and retries each
  request for minutes before failing.
  """
  if scheme(path) != "gs" or os.environ.get(EMULATOR_VAR, "") not in ("", "default"):
    return None
  if "gs" not in _credentials_checked:
    try:
      import google.auth  # pylint: disable=import-outside-toplevel

      google.auth.default()
      _credentials_checked["gs"] = None
    except Exception as e:  # pylint: disable=broad-exception-caught  # DefaultCredentialsError, TransportError
      _credentials_checked["gs"] = f"{_short(e)}; {credentials_hint(path)}"
  reason = _credentials_checked["gs"]
  return None if reason is None else f"no credentials for {path} ({reason})"


def check_readable(key: str, path, kind: str = "path") -> epath.Path:
  """`path` as an epath.Path when it exists; else ConfigError `key: <why>` (missing bucket / object / credentials).

  `kind` is "file", "dir" or "path" (either).
  """
  problem = credentials_problem(path)
  if problem:
    raise ConfigError(f"{key}: {problem}")
  p = as_path(path)
  try:
    found = p.is_file() if kind == "file" else p.is_dir() if kind == "dir" else p.exists()
  except Exception as e:  # pylint: disable=broad-exception-caught  # fsspec clients raise many types
    raise ConfigError(f"{key}: {describe_failure(path, e)}") from None
  if not found:
    if kind != "path" and _exists_quietly(p):
      raise ConfigError(f"{key}: {path} is not a {'file' if kind == 'file' else 'directory'}")
    raise ConfigError(f"{key}: {describe_failure(path)}")
  return p


def _exists_quietly(p: epath.Path) -> bool:
  try:
    return p.exists()
  except Exception:  # pylint: disable=broad-exception-caught
    return False


def check_writable(key: str, directory, probe_name: str = ".write_probe") -> None:
  """ConfigError `key: <why>` unless an object can be written (then deleted) in `directory`; creates local dirs."""
  problem = credentials_problem(directory)
  if problem:
    raise ConfigError(f"{key}: cannot write to {directory}: {problem}")
  d = as_path(directory)
  probe = d / probe_name
  try:
    if not is_remote(directory):
      d.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    if is_remote(directory):
      raise ConfigError(f"{key}: cannot write to {directory}: {describe_failure(directory, e)}") from None
    raise ConfigError(f"{key}: cannot write to {directory}: {e.strerror or e}") from None
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise ConfigError(f"{key}: cannot write to {directory}: {describe_failure(directory, e)}") from None
