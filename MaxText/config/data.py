"""Config keys: data."""

from MaxText.config.declare import BOOL, Key, LIST_OF_STR, NONNEG, POS, STR, Str

TITLE = "data"
KEYS = (
    Key(
        "dataset_type",
        "grain",
        Str("synthetic", "grain", "tfds", "hf"),
        "synthetic | grain | tfds | hf (default: the quickstart corpus below)",
    ),
    Key("dataset_path", "", STR, "root directory for tfds data (local or a bucket: gs://...)"),
    Key(
        "tokenizer_type",
        "sentencepiece",
        Str("sentencepiece", "huggingface", "tiktoken"),
        "sentencepiece | huggingface | tiktoken",
    ),
    Key(
        "tokenizer_path",
        "assets/tokenizer_pydoc_4k.model",
        STR,
        ".model, tokenizer.json or .tiktoken file, local (relative: cwd, then repo root) or in a bucket (gs://...)",
    ),
    Key("add_bos", True, BOOL, "prepend the tokenizer's bos token to each document"),
    Key("add_eos", True, BOOL, "append the tokenizer's eos token to each document"),
    Key("packing", True, BOOL, "pack documents into max_target_length rows (false pads each one)"),
    Key("data_shuffle_seed", 0, NONNEG, "seed for data shuffling"),
    Key("num_epoch", 10, POS, "passes over the training data (the small quickstart corpus is seen several times)"),
    Key(
        "train_data_columns",
        ["text"],
        LIST_OF_STR,
        "record fields holding a document's text (several are joined with newlines)",
    ),
    Key(
        "long_document_mode",
        "chunk",
        Str("chunk", "truncate"),
        "documents longer than max_target_length: chunk (into several rows) | truncate",
    ),
    Key(
        "packing_bins",
        8,
        NONNEG,
        "rows each data stream's first-fit packer keeps open at once (0 = the rows the stream feeds per step)",
    ),
    Key(
        "data_streams",
        0,
        NONNEG,
        "independent read/shuffle/pack streams feeding fixed rows of the global batch: data independent of "
        "process/device/worker count (0 = one per row)",
    ),
    Key(
        "grain_train_files",
        "assets/data/pydoc_train.jsonl",
        STR,
        'grain: train file glob(s), local or gs://... (** = any depth); mixture: "glob:weight;glob:weight" (quickstart'
        " corpus)",
    ),
    Key(
        "grain_eval_files",
        "assets/data/pydoc_eval.jsonl",
        STR,
        "grain: file glob(s) for eval (same syntax; used when eval_interval > 0)",
    ),
    Key(
        "grain_file_type",
        "auto",
        Str("auto", "arrayrecord", "parquet", "jsonl", "text"),
        "grain: auto (by extension) | arrayrecord | parquet | jsonl | text (one document per line)",
    ),
    Key(
        "grain_worker_count",
        0,
        NONNEG,
        "grain: worker processes that read, tokenize and pack (0 = in the training process)",
    ),
    Key("dataset_name", "", STR, "tfds: name[/config][:version] of a prepared dataset under dataset_path"),
    Key("eval_dataset_name", "", STR, 'tfds: dataset to evaluate on ("" = dataset_name)'),
    Key("train_split", "train", STR, "tfds/hf: split to train on"),
    Key("eval_split", "validation", STR, "tfds/hf: split to evaluate on (when eval_interval > 0)"),
    Key(
        "hf_path",
        "",
        STR,
        "hf: builder for data files (json | parquet | text | arrow | csv) or a dataset directory (local or gs://...)",
    ),
    Key("hf_data_files", "", STR, "hf: file glob(s) to train on (local or gs://...), read by the hf_path builder"),
    Key("hf_eval_files", "", STR, 'hf: file glob(s) for eval ("" = eval_split of the train dataset)'),
    Key("tokenizer_bos_token", "", STR, 'token to use as bos ("" = the tokenizer\'s own)'),
    Key("tokenizer_eos_token", "", STR, 'token to use as eos ("" = the tokenizer\'s own)'),
    Key("tokenizer_pad_token", "", STR, 'token to use as pad ("" = the tokenizer\'s own, else id 0)'),
    Key(
        "tokenizer_special_tokens",
        [],
        LIST_OF_STR,
        "tiktoken: special tokens numbered after the ranks ([] = Llama 3's 256)",
    ),
    Key("tiktoken_pattern", "", STR, 'tiktoken: pre-tokenization regex ("" = Llama 3\'s)'),
    Key(
        "use_sft",
        False,
        BOOL,
        "supervised fine-tuning on conversations: records are chats (train_data_columns: [messages] or [prompt,"
        " completion]) rendered with the chat template; add_bos/add_eos are the template's business",
    ),
    Key(
        "sft_train_on_completion_only",
        True,
        BOOL,
        "use_sft: the loss covers only assistant turns (false: every token of the conversation)",
    ),
    Key(
        "use_dpo",
        False,
        BOOL,
        "direct preference optimization: records are (prompt, chosen, rejected) (train_data_columns: [prompt, chosen,"
        " rejected]) rendered with the chat template, one pair per row",
    ),
    Key(
        "chat_template_path",
        "",
        STR,
        "Jinja chat template file for use_sft and serve's chat (\"\" = the tokenizer's own, else the default template)",
    ),
    Key("tokenizer_train_max_chars", 200000000, POS, "train_tokenizer: characters of training text to read at most"),
)
