"""The HTTP routes of API.md, one module per resource; each reads as parse → call → shape."""
