from sdlora.cli import main

raise SystemExit(main())
