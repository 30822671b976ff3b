"""vtn.evaluate"""
