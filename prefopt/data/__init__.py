"""Preference data, one file per source format:

  types.py           PreferenceExample, BadRows, reading fields of a row (the leaf)
  conversation.py    the HH-style text every public format is rendered into
  sources.py         local files and hub datasets, held-out eval split, n_train
  synthetic.py       the bundled, verifiable sorting task (dataset=synthetic)
  jsonl.py           a user's own .jsonl/.json/.parquet file (dataset=jsonl)
  unpaired.py        KTO's unpaired rows {prompt, completion, label}; pairs split into them
  hh.py, shp.py, ultrafeedback.py   the public formats

Tokenization and batching are in preference_datasets.py at the top level.
"""
