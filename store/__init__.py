"""vtn.store"""
