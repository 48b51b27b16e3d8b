"""Training objectives behind one interface (base.py): the language-model loss of pretraining and SFT
(language_model.py) and DPO (dpo.py). build.build_objective picks the run's; the training loop knows none by name.
"""
