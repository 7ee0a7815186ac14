"""Text data: the offline Wikipedia shipped with dllmq, the study's calibration sets, local files."""
from dllmq.data.text import (
    CORPORA,
    calibration_set,
    chat_windows,
    document_windows,
    calibration_windows,
    check_corpus,
    eval_token_ids,
    heldout_text,
    load_corpus,
    mask_windows,
    tokenize_text,
    wiki_articles,
)

__all__ = ["CORPORA", "calibration_set", "chat_windows", "document_windows", "calibration_windows", "check_corpus", "eval_token_ids", "heldout_text",
           "load_corpus", "mask_windows", "tokenize_text", "wiki_articles"]
