"""vtn.extract"""
