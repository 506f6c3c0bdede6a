"""rails"""
