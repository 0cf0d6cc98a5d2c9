"""What eval computes: held-out perplexity per document, multiple-choice accuracy, and the report card."""
