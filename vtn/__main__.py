from vtn.cli import main

raise SystemExit(main())
