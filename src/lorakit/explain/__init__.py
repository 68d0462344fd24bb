"""`lorakit explain`: what an adapter does to one input, token by token.

    from lorakit.explain import explain, summary_text, write_html
    found = explain(model, tokenizer, "Reverse the order of the words: red fox blue\\nAnswer:")
    print(summary_text(found))

`core` computes (pure functions over a model and its adapters), `probe` instruments the adapted
modules, `attribution` splits the output change over them, `summary` and `page` report it, and
`command` is the command line's part.
"""

from .core import Component, Explanation, ModuleActivity, OutputStep, explain

__all__ = ["Component", "Explanation", "ModuleActivity", "OutputStep", "explain"]
