"""gr2.flows"""
