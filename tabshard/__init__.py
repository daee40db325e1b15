"""tabshard"""
