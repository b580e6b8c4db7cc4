"""Vision-language models made here: pretrained encoders, projectors, the aligned folder."""
