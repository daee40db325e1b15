"""tab_worker"""
