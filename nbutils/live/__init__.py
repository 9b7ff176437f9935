"""Live analysis: the interactive API (`nbutils.open_run`), the subject model loaded for it, and the viewer's
live tabs. It runs models and LLMs; the views below it (`nbutils.view`) only draw what a run stored."""
