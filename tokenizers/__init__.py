"""gr2.tokenizers"""
