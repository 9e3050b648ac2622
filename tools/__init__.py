"""Developer tools around the app that neither build a study nor serve it (e.g. `tools.browser`)."""
