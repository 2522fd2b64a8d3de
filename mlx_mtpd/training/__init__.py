"""Training MTP-D heads on the device: the backbone's answers as data
(`gen_data`, captured while generating by `capture`), the token data set that
grows run after run (`dataset`), the backbone's cached outputs (`data_cache`),
the trainer and its loss (`train`), held-out evaluation (`eval_heads`) and new
head sets (`init_heads`).  Inference never imports this package."""
