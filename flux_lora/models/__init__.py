"""The base weights: `layout` (folder names, repos), `locate` (what setup loads), `files` (is a
folder complete) and `download` (fetching the folders)."""
