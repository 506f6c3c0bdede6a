"""cross_entropy"""
