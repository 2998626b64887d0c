"""Document filters for the task YAMLs beside this file (lm-evaluation-harness `process_docs`)."""


def clear_sts_pairs(dataset):
    """KorSTS pairs with a clear answer: label 1 from score 4.0 up, 0 up to 1.0."""
    clear = dataset.filter(lambda doc: not 1.0 < float(doc["score"]) < 4.0)
    return clear.map(lambda doc: {"label": int(float(doc["score"]) >= 4.0)})


def rated_reviews(dataset):
    """NSMC reviews rated 1-4 (label 0) or 9-10 (label 1), as the official split."""
    rated = dataset.filter(lambda doc: not 5 <= int(doc["rating"]) <= 8 and doc["review"].strip())
    return rated.map(lambda doc: {"label": int(int(doc["rating"]) >= 9)})
