"""gr2.pipelines"""
