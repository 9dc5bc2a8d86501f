"""Opening a Hugging Face dataset split, from the Hub or from local files: one reader for `vlm train`
(data kind hf) and `vlm eval --data`, so a file or folder that one of them reads, the other reads the same way.

Local data that carries no dataset card (one .parquet / .json / .jsonl / .csv file, an image folder with a
metadata file, a folder of parquet shards such as `llava_instruct.parquet/train-0000N-of-0000M.parquet`)
holds the splits `datasets` makes of its file names, "train" unless the files say otherwise. Where that is
one split, it is read whatever split was asked for: the name was never chosen by whoever made the files.
A folder with a README.md card (a snapshot of a Hub repo) declares its configs and split names, and those
are checked, as they are on the Hub.
"""

from __future__ import annotations

from pathlib import Path

from vlm.config import ConfigError

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def looks_local(source: str) -> bool:
    # A Hub id is "name" or "owner/name"; anything else that is not on disk is a mistyped path.
    return (Path(source).exists() or source.startswith((".", "/", "~")) or source.count("/") > 1
            or Path(source).suffix in LOCAL_FORMATS)


def open_dataset(source: str, split: str, config: str | None = None, *, context: str, set_path: str,
                 set_split: str, set_config: str | None = None):
    """The `split` of `source` (a Hub id, or a local file or folder) as a `datasets.Dataset`.

    `config` names a Hub config, and applies to a local folder only where it carries the Hub's card.
    Errors are ConfigErrors starting with `context` ("data.instruct", a benchmark name); `set_path`,
    `set_split` and `set_config` say how the caller changes the path, the split and the config
    ("pass --data PATH", "set data.align.split=NAME"; None where the caller fixes the config).
    """
    import datasets

    path = Path(source).expanduser()
    if looks_local(source) and not path.exists():
        raise ConfigError(f"{context}: {source}: no such file or folder")
    carded = path.is_dir() and (path / "README.md").is_file()
    if path.is_file():
        if path.suffix not in LOCAL_FORMATS:
            raise ConfigError(f"{context}: {source}: use a .parquet, .json, .jsonl or .csv file, or a dataset folder")
        args, kwargs = (LOCAL_FORMATS[path.suffix],), {"data_files": str(path)}
    elif path.is_dir():
        # A bare folder has no configs; a snapshot with the Hub's card has the Hub's.
        args, kwargs = (str(path), config if carded else None), {}
    else:
        args, kwargs = (source, config), {}
    try:
        if path.exists() and not carded:
            # The builder lists the splits from the file names, without reading the data.
            splits = list(datasets.load_dataset_builder(*args, **kwargs).config.data_files or {})
            if len(splits) == 1:
                split = str(splits[0])
        return datasets.load_dataset(*args, split=split, **kwargs)
    except ValueError as e:
        lines = str(e).splitlines()
        message = lines[0]
        if "config" in message.lower():
            # A dataset of several configs names them on its second line.
            message = " ".join(line.strip() for line in lines[:2])
            fix = f" ({set_config})" if set_config else ""
        else:
            fix = f" ({set_split})" if "split" in message.lower() else ""
        raise ConfigError(f"{context}: cannot read split {split!r} of {source}: {message}{fix}") from None
    except (OSError, datasets.exceptions.DatasetNotFoundError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"{context}: could not load {source} ({message}); download it where there is internet, "
            f"then {set_path} to the local copy"
        ) from None
