"""`mrcnn spec validate|show SPEC`."""

from mrcnn_helpers.spec import format_spec, load_spec


def run(args) -> int:
    spec = load_spec(args.spec)
    if args.action == "show":
        print(format_spec(spec), end="")
    else:
        print(f"{args.spec}: valid")
    return 0
