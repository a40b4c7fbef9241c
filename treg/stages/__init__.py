"""The data path, one module per stage: sample -> score -> annotate -> train -> generate/eval (+ show, pipeline)."""
