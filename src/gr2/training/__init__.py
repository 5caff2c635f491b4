"""gr2.training"""
