"""Local HTTP serving: TGI's router API and the OpenAI routes over one in-process engine."""
