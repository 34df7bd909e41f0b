"""LoRAs, in the order a request uses them: `refs` (what a reference names), `fetch` (to a verified
file), `cache` (kept on disk), `files` (a tarball's member), `adapters` (applied eagerly, or the
`TransformerAdapters` protocol both kinds follow) and `slots` (applied to a compiled transformer)."""
