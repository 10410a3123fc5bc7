"""The upstream importer: sqrti/SPA-VL's layout -> a dataset folder."""
