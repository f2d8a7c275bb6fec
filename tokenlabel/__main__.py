from tokenlabel.cli import main

raise SystemExit(main())
