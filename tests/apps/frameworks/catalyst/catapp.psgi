use strict;
use warnings;
use File::Basename ();
use File::Spec ();
use lib File::Spec->catdir(File::Spec->rel2abs(File::Basename::dirname(__FILE__)), 'lib');
use CatApp;

CatApp->apply_default_middlewares(CatApp->psgi_app);
