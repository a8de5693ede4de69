"""A UI-format workflow file to the API prompt, with the editor's rules (tools/editor_rules.py).

Its own script so the rules module stays below the core node declarations (tools/comfy_core_nodes.py
reads editor_rules; editor_rules reads nothing of tools/).
"""


def main(argv=None) -> int:
    """python tools/workflow_to_api.py WORKFLOW.json  ->  the API prompt on stdout (this pack's nodes
    plus the core nodes tools/comfy_core_nodes.py declares)."""
    import json
    import sys
    from pathlib import Path

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(main.__doc__, file=sys.stderr)
        return 2
    repo = Path(__file__).resolve().parent.parent
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from tools.comfy_core_nodes import core_definitions
    from tools.editor_rules import definitions_from_classes, to_api_prompt

    definitions = {**core_definitions(), **definitions_from_classes(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)}
    workflow = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    print(json.dumps(to_api_prompt(workflow, definitions), indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
