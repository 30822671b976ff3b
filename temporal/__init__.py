"""vtn.temporal"""
