"""The CNI contract: config decoding and validation, results, error codes, per-request settings.

Imports nothing else of bwplugin."""
