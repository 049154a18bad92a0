"""Building blocks of `scripts/train_default_model.py`: corpus, tokenizer, training, hub export, report and card.

Boundary: this package only *makes* files under src/adapmoe_cli/default_model/; nothing in the installed
`adapmoe_cli` package imports it. The model family (Mixtral today) is named in one place, `training.family`.
"""
