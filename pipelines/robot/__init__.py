"""gr2.pipelines.robot"""
