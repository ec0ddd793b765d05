from loraplex.convert.cli import main

raise SystemExit(main())
