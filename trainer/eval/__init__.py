"""Evaluation of distilled students (and of their teachers) on the thesis's benchmarks.

Works on an exported student, a checkpoint or a run directory (`trainer.export.load_student`),
or on a Data2Vec2 fairseq checkpoint (to compare a student with its teacher); it never imports
the training loop. Modules, from pure maths to the command line:

    metrics.py       top-k accuracy with an explicit tie rule, per-class accuracy
    knn.py           k-NN classification (cosine, temperature-weighted votes)
    linear_probe.py  LayerNorm + linear head trained on frozen features
    retrieval.py     image<->text Recall@k, positives decided by image ids
    zero_shot.py     the 80 CLIP prompt templates, class text embeddings, zero-shot logits
    features.py      pooling, feature extraction through the loader, the on-disk feature cache
    models.py        what is evaluated: encoders, preprocessing and provenance of a model file
    results.py       the one record every evaluation writes, and the registry of evaluations (metric
                     keys, protocol, the thesis figures `trainer report` may set beside a result)
    benchmarks.py    one function per benchmark, gluing the above (the CLI calls these)
    glue.py          GLUE fine-tuning of text students (its own command and record)
    cli.py           `trainer eval probe|retrieval|zero-shot|glue`
"""
